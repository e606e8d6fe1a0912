// SPDX-License-Identifier: GPL-2.0
/*
 * uio_ivshmem - UIO driver for the QEMU ivshmem PCI device (1af4:1110), with MSI-X.
 *
 * Part of ivshmem_comm (guest side). Debian's kernel has no driver that delivers
 * ivshmem-doorbell interrupts to user space: uio_pci_generic is INTx-only and the
 * doorbell model of QEMU >= 2.6 is MSI-X only. This module fills that hole.
 *
 * User-space interface
 * --------------------
 * For every bound ivshmem device the driver registers one UIO device per
 * interrupt vector:
 *
 *   - MSI-X (ivshmem-doorbell, vectors=N): N UIO devices, vector 0..N-1, in order.
 *   - INTx (ivshmem-doorbell,msi=off): one UIO device; the handler acknowledges
 *     the interrupt by reading IntrStatus (IntrMask is set to all ones at probe).
 *   - no interrupt (ivshmem-plain): one UIO device without an interrupt; read()
 *     on it fails with EIO, the maps work.
 *
 * Each UIO device reports in sysfs (/sys/class/uio/uioX/):
 *   name     "uio_ivshmem"
 *   version  "vector=K nvectors=N mode=msix|intx|none"
 *   device   -> the PCI device (so the BDF is readlink(device))
 *   maps/map0  BAR0, the 256-byte register block (mapped uncached; use 32-bit
 *              accesses: IntrMask 0, IntrStatus 4, IVPosition 8, Doorbell 12)
 *   maps/map1  BAR2, the shared memory (mapped write-back cacheable: it is RAM
 *              on the host, and uncached access would be needlessly slow)
 * The BARs stay mappable through sysfs resource0/resource2 as well (the driver
 * does not claim them; sysfs "enable" is already 1 and writing it gives EBUSY
 * while the driver is bound).
 * Every vector's device exposes the same two maps. mmap() map K with
 * offset K * page_size, as for any UIO device.
 *
 * read(fd, buf, 4) blocks until the vector's interrupt fires and returns the
 * 32-bit count of interrupts seen so far on that vector (poll/select work too).
 * write(fd, &(int32){0 or 1}, 4) disables / re-enables the vector's interrupt;
 * MSI-X is edge-triggered, so no re-enable is needed after each interrupt.
 * A doorbell is rung by writing (peer_id << 16) | vector to register 12 of map0.
 */

#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/kernel.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/uio_driver.h>
#include <linux/version.h>

#define DRV_NAME "uio_ivshmem"
#define IVSHMEM_VENDOR 0x1af4
#define IVSHMEM_DEVICE 0x1110

#define IVSHMEM_REG_INTRMASK 0x00
#define IVSHMEM_REG_INTRSTATUS 0x04

#define IVSHMEM_MAX_VECTORS 64

enum ivshmem_mode { MODE_NONE, MODE_INTX, MODE_MSIX };

struct ivshmem_vec {
	struct uio_info info;
	struct ivshmem_dev *dev;
	unsigned int index;
	bool registered;
	bool disabled;
	spinlock_t lock; /* protects disabled */
};

struct ivshmem_dev {
	struct pci_dev *pdev;
	void __iomem *regs;
	enum ivshmem_mode mode;
	unsigned int nvec;
	struct ivshmem_vec *vecs;
};

static const char *const mode_names[] = { "none", "intx", "msix" };

static irqreturn_t ivshmem_msix_handler(int irq, struct uio_info *info)
{
	/* Edge-triggered and per-vector: nothing to acknowledge. */
	return IRQ_HANDLED;
}

static irqreturn_t ivshmem_intx_handler(int irq, struct uio_info *info)
{
	struct ivshmem_vec *vec = info->priv;
	u32 status;

	/* Reading IntrStatus clears it; zero means the (shared) line was not ours. */
	status = readl(vec->dev->regs + IVSHMEM_REG_INTRSTATUS);
	if (!status || status == 0xffffffff)
		return IRQ_NONE;
	return IRQ_HANDLED;
}

static int ivshmem_irqcontrol(struct uio_info *info, s32 irq_on)
{
	struct ivshmem_vec *vec = info->priv;
	unsigned long flags;

	if (info->irq == UIO_IRQ_NONE)
		return -EIO;
	spin_lock_irqsave(&vec->lock, flags);
	if (irq_on && vec->disabled) {
		vec->disabled = false;
		enable_irq(info->irq);
	} else if (!irq_on && !vec->disabled) {
		vec->disabled = true;
		disable_irq_nosync(info->irq);
	}
	spin_unlock_irqrestore(&vec->lock, flags);
	return 0;
}

static int ivshmem_mmap(struct uio_info *info, struct vm_area_struct *vma)
{
	/* The UIO core has checked that vm_pgoff names a map and the length fits. */
	struct uio_mem *mem = &info->mem[vma->vm_pgoff];
	unsigned long len = vma->vm_end - vma->vm_start;

	if (vma->vm_pgoff == 0)
		vma->vm_page_prot = pgprot_noncached(vma->vm_page_prot);
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_set(vma, VM_IO | VM_DONTEXPAND | VM_DONTDUMP);
#else
	vma->vm_flags |= VM_IO | VM_DONTEXPAND | VM_DONTDUMP;
#endif
	return io_remap_pfn_range(vma, vma->vm_start, mem->addr >> PAGE_SHIFT, len,
				  vma->vm_page_prot);
}

static void ivshmem_unregister_all(struct ivshmem_dev *dev)
{
	unsigned int i;

	for (i = 0; i < dev->nvec; i++) {
		if (dev->vecs[i].registered) {
			uio_unregister_device(&dev->vecs[i].info);
			dev->vecs[i].registered = false;
		}
	}
}

static int ivshmem_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct ivshmem_dev *dev;
	unsigned int i;
	int nmsix, ret;

	dev = devm_kzalloc(&pdev->dev, sizeof(*dev), GFP_KERNEL);
	if (!dev)
		return -ENOMEM;
	dev->pdev = pdev;

	ret = pcim_enable_device(pdev);
	if (ret)
		return ret;
	/*
	 * The BARs are mapped but deliberately not claimed (no pci_request_region): with
	 * CONFIG_IO_STRICT_DEVMEM (Debian) a claimed BAR can no longer be mmapped through
	 * /sys/bus/pci/devices/<BDF>/resourceN, and user space may use either path.
	 */
	dev->regs = pcim_iomap(pdev, 0, 0);
	if (!dev->regs)
		return -ENOMEM;
	if (!pci_resource_len(pdev, 2)) {
		dev_err(&pdev->dev, "BAR2 (shared memory) is missing\n");
		return -ENODEV;
	}
	pci_set_master(pdev);

	nmsix = pci_msix_vec_count(pdev);
	if (nmsix > 0) {
		nmsix = min(nmsix, IVSHMEM_MAX_VECTORS);
		ret = pci_alloc_irq_vectors(pdev, nmsix, nmsix, PCI_IRQ_MSIX);
		if (ret < 0) {
			dev_err(&pdev->dev, "cannot enable %d MSI-X vectors: %d\n", nmsix, ret);
			return ret;
		}
		dev->mode = MODE_MSIX;
		dev->nvec = nmsix;
	} else if (pdev->irq) {
		dev->mode = MODE_INTX;
		dev->nvec = 1;
		writel(0xffffffff, dev->regs + IVSHMEM_REG_INTRMASK);
	} else {
		dev->mode = MODE_NONE;
		dev->nvec = 1;
	}

	dev->vecs = devm_kcalloc(&pdev->dev, dev->nvec, sizeof(*dev->vecs), GFP_KERNEL);
	if (!dev->vecs) {
		ret = -ENOMEM;
		goto err_vectors;
	}
	pci_set_drvdata(pdev, dev);

	for (i = 0; i < dev->nvec; i++) {
		struct ivshmem_vec *vec = &dev->vecs[i];
		struct uio_info *info = &vec->info;

		vec->dev = dev;
		vec->index = i;
		spin_lock_init(&vec->lock);
		info->priv = vec;
		info->name = DRV_NAME;
		info->version = devm_kasprintf(&pdev->dev, GFP_KERNEL,
					       "vector=%u nvectors=%u mode=%s", i, dev->nvec,
					       mode_names[dev->mode]);
		if (!info->version) {
			ret = -ENOMEM;
			goto err_unregister;
		}
		info->mem[0].name = "registers";
		info->mem[0].addr = pci_resource_start(pdev, 0);
		info->mem[0].size = pci_resource_len(pdev, 0);
		info->mem[0].memtype = UIO_MEM_PHYS;
		info->mem[0].internal_addr = dev->regs;
		info->mem[1].name = "shmem";
		info->mem[1].addr = pci_resource_start(pdev, 2);
		info->mem[1].size = pci_resource_len(pdev, 2);
		info->mem[1].memtype = UIO_MEM_PHYS;
		info->mmap = ivshmem_mmap;
		info->irqcontrol = ivshmem_irqcontrol;
		switch (dev->mode) {
		case MODE_MSIX:
			info->irq = pci_irq_vector(pdev, i);
			info->irq_flags = 0;
			info->handler = ivshmem_msix_handler;
			break;
		case MODE_INTX:
			info->irq = pdev->irq;
			info->irq_flags = IRQF_SHARED;
			info->handler = ivshmem_intx_handler;
			break;
		default:
			info->irq = UIO_IRQ_NONE;
			break;
		}
		ret = uio_register_device(&pdev->dev, info);
		if (ret) {
			dev_err(&pdev->dev, "uio_register_device(vector %u): %d\n", i, ret);
			goto err_unregister;
		}
		vec->registered = true;
	}
	dev_info(&pdev->dev, "ivshmem: %u uio device(s), mode %s, shmem %pa bytes\n", dev->nvec,
		 mode_names[dev->mode], &dev->vecs[0].info.mem[1].size);
	return 0;

err_unregister:
	ivshmem_unregister_all(dev);
err_vectors:
	if (dev->mode == MODE_INTX)
		writel(0, dev->regs + IVSHMEM_REG_INTRMASK);
	if (dev->mode == MODE_MSIX)
		pci_free_irq_vectors(pdev);
	return ret;
}

static void ivshmem_remove(struct pci_dev *pdev)
{
	struct ivshmem_dev *dev = pci_get_drvdata(pdev);

	ivshmem_unregister_all(dev);
	if (dev->mode == MODE_INTX)
		writel(0, dev->regs + IVSHMEM_REG_INTRMASK);
	if (dev->mode == MODE_MSIX)
		pci_free_irq_vectors(pdev);
}

static const struct pci_device_id ivshmem_ids[] = {
	{ PCI_DEVICE(IVSHMEM_VENDOR, IVSHMEM_DEVICE) },
	{ 0 },
};
MODULE_DEVICE_TABLE(pci, ivshmem_ids);

static struct pci_driver ivshmem_driver = {
	.name = DRV_NAME,
	.id_table = ivshmem_ids,
	.probe = ivshmem_probe,
	.remove = ivshmem_remove,
};
module_pci_driver(ivshmem_driver);

MODULE_DESCRIPTION("UIO driver for the QEMU ivshmem device, one UIO device per MSI-X vector");
MODULE_AUTHOR("ivshmem_comm");
MODULE_LICENSE("GPL");
